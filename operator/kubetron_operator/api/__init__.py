"""The MegatronJob API (kubetron.io/v1alpha1): pydantic models, the one schema source."""
