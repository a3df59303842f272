"""Signed versions (issue 12): keys, the DSSE envelope, statements, the trust policy, the verifier.

The publisher, not the transport, decides what runs: a publisher key signs a version
statement (artifact@version is this manifest id) and each channel move (with a
sequence and an expiry); a site or client holds a trust policy (which keys, for which
artifacts and channels, how many of them) and accepts only what it verifies. The
formats are in docs/formats.md "Signed statements", the threat model, the trust file
and the CLI in docs/trust.md.
"""

from fabric.trust.envelope import Envelope, canonical, digest, sign
from fabric.trust.keys import Key, PublicKey, generate_key, keyid, load_private_key, load_public_key
from fabric.trust.policy import TrustPolicy
from fabric.trust.statements import (ChannelStatement, DelegationsStatement, Rule, VersionStatement,
                                     next_channel_statement)
from fabric.trust.verifier import TrustState, Verified, Verifier

__all__ = ["Key", "PublicKey", "load_private_key", "load_public_key", "generate_key", "keyid", "Envelope",
           "sign", "canonical", "digest", "VersionStatement", "ChannelStatement", "DelegationsStatement", "Rule",
           "TrustPolicy", "Verifier", "Verified", "TrustState", "next_channel_statement"]
