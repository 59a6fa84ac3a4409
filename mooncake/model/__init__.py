"""The contract as code: pure torch functions that define every result bit for bit."""
