"""The ServerApp: SecAgg+ rounds over the sites (SecureAggregationWorkflow), then an evaluation;
the final model and a metrics JSON go to the out folder."""

from secure_fl.integrations.flower.monai_app import make_monai_server_app

app = make_monai_server_app()
