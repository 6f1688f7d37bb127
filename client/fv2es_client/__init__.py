"""FV2ES client: the tensor contract and a gRPC client for the served `fv2es` ensemble."""
from fv2es_client.client import (  # noqa: F401
    Fv2esClient, Fv2esError, InputRejected, InvalidInput, ModelNotReady, Prediction, ServerError,
    ServerUnreachable, Timeout,
)
