"""m2m-proxy: a forward authenticating HTTP proxy for OAuth2 Client Credentials."""

__version__ = "0.1.0"
