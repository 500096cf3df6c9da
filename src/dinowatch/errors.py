"""The one base class of every error dinowatch raises on purpose."""


class DinowatchError(Exception):
    """Base of dinowatch's own errors; subclasses live beside the code that raises them."""
