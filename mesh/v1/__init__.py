"""Generated from protos/mesh/v1 by `make protos`; do not edit."""
