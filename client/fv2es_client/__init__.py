"""FV2ES client: the tensor contract and a gRPC client for the served `fv2es` ensemble.

`from fv2es_client import Fv2esClient, Prediction` works; the client (and tritonclient)
is imported only when asked for, so the server side can read the contract alone.
"""
_CLIENT_NAMES = {"Fv2esClient", "Fv2esError", "InputRejected", "InvalidInput", "ModelNotReady",
                 "Prediction", "ServerError", "ServerUnreachable", "Timeout"}


def __getattr__(name):
    if name in _CLIENT_NAMES:
        from fv2es_client import client

        return getattr(client, name)
    raise AttributeError(f"module 'fv2es_client' has no attribute {name!r}")
