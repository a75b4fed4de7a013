"""The admin's JSON API, one module per resource; each exposes ``build(ctx) -> APIRouter``."""
