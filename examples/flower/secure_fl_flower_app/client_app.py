"""The ClientApp: local 3D-UNet training behind the secure_fl mod (the site's update leaves only
masked; the node's secure_fl identity comes from its own node config, or in simulation from the
folder the ServerApp provisioned)."""

from secure_fl.integrations.flower.monai_app import make_monai_client_app

app = make_monai_client_app()
