"""Membership and control plane shared by every data plane: views, wire headers, errors."""
