"""embedkit: specialise embedding and retrieval models to a domain, prove they got better, ship them.

The package follows the pipeline  data -> mine -> train -> eval -> export -> serve  (-> rag),
one sub-package per stage; `models` holds the encoders every stage shares.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(*args, **kwargs):
    """Load an encoder by short name (`minilm`, `smollm2-135m`), local folder or Hugging Face id."""
    from embedkit.models import load_model as _load

    return _load(*args, **kwargs)
