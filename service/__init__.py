"""HTTP ingress of fhe-bento: routes, validation, errors and the SageMaker adapter."""
