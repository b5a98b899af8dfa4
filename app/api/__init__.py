"""The HTTP layer: thin routes over :class:`app.serving.service.Service`."""
