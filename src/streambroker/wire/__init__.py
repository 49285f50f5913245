"""Events as they travel: the entry format of a stream, the payload codecs, and the
:class:`~streambroker.wire.events.Event` a handler receives."""
