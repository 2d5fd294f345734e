"""Errors that shoal raises on purpose, each with a message that says what to change."""


class ShoalError(Exception):
    """Base class for shoal's own errors."""


class InvalidRequestError(ShoalError, ValueError):
    """A request (prompt or sampling parameters) that can never be served as given."""


class GrammarError(InvalidRequestError):
    """A structured output whose grammar cannot be built, or that failed while the answer was generated."""


class ModelLoadError(ShoalError):
    """A model that cannot be found, read or understood."""


class EngineDeadError(ShoalError):
    """The engine loop stopped; no further requests can be served."""


class DisposedError(ShoalError):
    """A disposed conversation, sequence or session was used."""


class NoSequenceAvailableError(ShoalError):
    """Every sequence of a context is taken."""
