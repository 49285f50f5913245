"""Applications built on the faces: the command line, the worker, the demo, the
dashboard and the operations endpoints."""
