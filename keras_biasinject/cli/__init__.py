"""The `kbi` command."""
