"""FV2ES client: the tensor contract and a gRPC client for the served `fv2es` ensemble."""
