"""Access tokens: the value type, the IdP client and the single-flight cache."""
