"""aiaas: a self-hosted, multi-tenant AI models as a service platform."""

__version__ = "0.1.0"
