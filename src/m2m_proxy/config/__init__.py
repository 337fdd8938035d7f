"""The routes file: load, validate, and the frozen runtime model it becomes."""

from m2m_proxy.config.loader import ConfigError, load_config, parse_config
from m2m_proxy.config.model import (
    AccessPolicy,
    Address,
    AuthMethod,
    ClientCertificate,
    ClientConfig,
    Config,
    CredentialSpec,
    HttpsMode,
    Origin,
    ProxySettings,
    RouteConfig,
    Secret,
    SigningKey,
    Unmatched,
)
from m2m_proxy.config.source import Problem

__all__ = [
    "AccessPolicy",
    "Address",
    "AuthMethod",
    "ClientCertificate",
    "ClientConfig",
    "Config",
    "ConfigError",
    "CredentialSpec",
    "HttpsMode",
    "Origin",
    "Problem",
    "ProxySettings",
    "RouteConfig",
    "Secret",
    "SigningKey",
    "Unmatched",
    "load_config",
    "parse_config",
]
