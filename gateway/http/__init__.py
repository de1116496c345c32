"""HTTP front door: the ASGI app, routes, the server."""
