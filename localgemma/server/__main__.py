"""`python -m localgemma.server [OPTIONS]`: the same as `localgemma serve [OPTIONS]`."""

from .cli import serve

if __name__ == "__main__":
    serve(prog_name="localgemma serve")
