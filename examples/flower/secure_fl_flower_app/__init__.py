"""A Flower app: the MONAI 3D-UNet trained with secure_fl's secure aggregation (see README.md)."""
