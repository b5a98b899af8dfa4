"""``/v2``: the Open Inference Protocol — :mod:`.schemas` (its JSON objects), :mod:`.codec` (its wire
format) and :mod:`.routes` (the endpoints, thin over :meth:`app.serving.service.Service.infer`)."""

from app.api.oip.routes import router

__all__ = ["router"]
