"""MARIA: infilling with a frozen masked LM and a frozen causal LM fused by one trained linear head.

    import maria                                   # registers the "maria" model type with transformers
    from maria import MariaModel
    model = MariaModel.from_pretrained("path/to/checkpoint")   # or AutoModel / AutoModelForMaskedLM

The model core: backbones.py (loading, vocabulary alignment), features.py (the aligned features),
head.py (the fusion head), decode.py (KV-cached infilling), anneal.py (generation),
configuration_maria.py + modeling_maria.py (the Hugging Face classes), checkpoint.py (the folder).
Like other transformers-integrated libraries, importing it imports transformers.
"""

from importlib.metadata import PackageNotFoundError, version

from maria.configuration_maria import MariaConfig
from maria.modeling_maria import MariaModel, export, register

try:
    __version__ = version("maria-infill")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

register()
__all__ = ["MariaConfig", "MariaModel", "export", "__version__"]
