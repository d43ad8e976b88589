"""fhe-bento: serve concrete-ml FHE models with BentoML.

The product's folders sit at the top of the repository (`protocol/`, `client/`, `service/`, `runners/`,
`modelkit/`); `fhe_bento/<folder>` is a relative symlink to each, so `fhe_bento.service` is a plain
subpackage to Python, editors, type checkers and import graphs alike. The project is Linux-only.
"""
