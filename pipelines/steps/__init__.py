"""The one function per DAG task, a module per DAG: small JSON in, small JSON out."""
