"""Peer-to-peer runtime: identities, the signed wire format, transports,
the node actor, peer sampling and gossip.

``p2p`` knows nothing of blocks, OIDs or models: higher layers own message
channels (:class:`MessageType`) and decode their own bodies. See
``p2p/SPEC.md`` for the invariants each piece keeps and the tests that
check them.
"""

from .errors import (
    BadSignature,
    FrameTooLarge,
    HandshakeError,
    MalformedBody,
    MalformedEnvelope,
    NodeClosedError,
    NotMsgpack,
    P2PError,
    ReplayedSequence,
    SenderMismatch,
    StaleSequence,
    TrailingBytes,
    TransportError,
    UnknownMessageType,
    UnknownVersion,
    WireError,
)
from .gossip import Gossip, GossipConfig
from .identity import Identity, PeerId, short_id, verify
from .membership import CyclonConfig, PeerSampling
from .node import Node, Timer, open_node
from .randomness import RandomStream
from .simnet import Constant, LinkModel, LogNormal, SimNetwork, SimTransport, Uniform
from .tcp import TcpConfig, TcpTransport, open_tcp_transport
from .transport import Transport
from .wire import (
    RELAYABLE,
    Envelope,
    FrameCache,
    MessageType,
    SequenceWindow,
    decode,
    encode,
    sign,
)

__all__ = [
    "RELAYABLE",
    "BadSignature",
    "Constant",
    "CyclonConfig",
    "Envelope",
    "FrameCache",
    "FrameTooLarge",
    "Gossip",
    "GossipConfig",
    "HandshakeError",
    "Identity",
    "LinkModel",
    "LogNormal",
    "MalformedBody",
    "MalformedEnvelope",
    "MessageType",
    "Node",
    "NodeClosedError",
    "NotMsgpack",
    "P2PError",
    "PeerId",
    "PeerSampling",
    "RandomStream",
    "ReplayedSequence",
    "SenderMismatch",
    "SequenceWindow",
    "SimNetwork",
    "SimTransport",
    "StaleSequence",
    "TcpConfig",
    "TcpTransport",
    "Timer",
    "TrailingBytes",
    "Transport",
    "TransportError",
    "Uniform",
    "UnknownMessageType",
    "UnknownVersion",
    "WireError",
    "decode",
    "encode",
    "open_node",
    "open_tcp_transport",
    "short_id",
    "sign",
    "verify",
]
