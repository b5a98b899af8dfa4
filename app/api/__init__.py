"""The HTTP layer: thin routes over :class:`app.service.Service`."""
