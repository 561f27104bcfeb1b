"""The HTTP door: routes, request and response models, streaming, the gateway middleware, the OpenAPI document."""
