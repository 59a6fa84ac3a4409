"""The reference data plane: readable Python over UCX (ucxx). It defines the exact semantics."""
