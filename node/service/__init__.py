"""The node's gRPC service (MIP ``NodeService``), its Generate batcher and its server.

- ``Node``: model + tokenizer + store + runtime + scheduler + generator of one node;
- ``NodeServer`` / ``BackgroundServer``: grpc.aio server with health checking and reflection;
- ``NodeServicer``: the RPCs (see memfed.node.service.servicer for threads and error mapping);
- ``GenerateBatcher``: concurrent Generate calls as one mixed-module batch (memfed.node.service.batcher).

The client is ``memfed.client.NodeClient``.
"""

from memfed.node.service.batcher import GenerateBatcher
from memfed.node.service.node import Node
from memfed.node.service.server import BackgroundServer, NodeServer, tls_credentials
from memfed.node.service.servicer import NodeServicer

__all__ = ["BackgroundServer", "GenerateBatcher", "Node", "NodeServer", "NodeServicer", "tls_credentials"]
