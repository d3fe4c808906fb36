"""One exception family for lightning-qat.

Every error a user can trigger derives from :class:`QATError`, so callers can catch the family;
configuration errors also carry the key they are about, so a recipe loader can prefix the path
(``rules[2].weight.bits``) and a CLI can print one clear line instead of a traceback.
"""

from __future__ import annotations


class QATError(ValueError):
    """Base class of every error raised by lightning-qat for bad input or bad state."""


class ConfigError(QATError):
    """A spec or recipe value is wrong.

    ``key`` is the dotted path of the offending key (``weight.bits``), ``reason`` says what is
    wrong and what is allowed, and ``source`` names the file it came from, when there is one.
    """

    def __init__(self, key: str, reason: str, source: str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}`{key}`: {reason}")

    def under(self, prefix: str, source: str | None = None) -> ConfigError:
        """The same error with ``prefix`` put in front of the key (used by nested loaders)."""
        key = f"{prefix}.{self.key}" if prefix and self.key else prefix or self.key
        return ConfigError(key, self.reason, source or self.source)
