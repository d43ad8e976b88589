"""fhe-bento: serve concrete-ml FHE models with BentoML.

Installed, the product's folders are the subpackages `fhe_bento.client`, `fhe_bento.protocol`,
`fhe_bento.service`, `fhe_bento.runners` and `fhe_bento.modelkit` (pyproject.toml maps them). Run from a
checkout (`bentoml serve fhe_bento.service.app:FHEBento` in the repository, or the image built from it),
this package finds the same folders beside it.
"""

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "protocol" / "__init__.py").exists() and not (Path(__file__).parent / "protocol").exists():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (a package's __path__)
