"""Shared asks in a site's control chain (agents.site.control.UpstreamChain) and where a site
with a trust policy takes a version's envelope (agents.site.trust): through the chain, not from
each source.

A thousand sites that ask for the same statement at once must cost their upstream one request:
concurrent asks for a version's envelope, and for the newest delegations, share one request;
a version's envelope is kept `SIGNATURE_TTL` seconds (the delegations are not kept: a
revocation must reach the next ask). A counting server on 127.0.0.1 stands in for the relay
and for the origin.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from agents.site.control import UpstreamChain
from agents.site.trust import SiteTrust
from fabric.errors import NotFound
from fabric.wire.client import OriginClient
from fabric.wire.protocol import ENVELOPE, TRUST

SIG = "/v1/artifacts/m/versions/v1/signature"
CHANNEL = "/v1/artifacts/m/channels/prod"  # answered as SIG is: the body, or a 404


class Counting:
    """A server answering the signature and trust paths after `delay` s, counting each request."""

    def __init__(self, body: bytes | None, delay: float = 0.2):
        self.body, self.delay, self.asked = body, delay, []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.asked.append(request.path)
        await asyncio.sleep(self.delay)
        if self.body is None:
            return web.json_response({"code": "signature_not_found", "message": "none"}, status=404)
        return web.Response(body=self.body, content_type=ENVELOPE)

    async def listing(self, request: web.Request) -> web.Response:
        self.asked.append(request.path)
        return web.json_response({"versions": [{"version": "v1"}]})

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get(SIG, self.handle)
        app.router.add_get(TRUST, self.handle)
        app.router.add_get("/v1/artifacts/m/versions", self.listing)
        app.router.add_get(CHANNEL, self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def test_concurrent_asks_for_one_statement_cost_the_upstream_one_request():
    async def main():
        async with Counting(b'{"envelope": 1}') as relay, Counting(b"origin") as origin:
            chain = UpstreamChain([OriginClient(relay.url)], OriginClient(origin.url))
            sigs = await asyncio.gather(*[chain.get_signature("m", "v1") for _ in range(50)])
            trusts = await asyncio.gather(*[chain.get_trust() for _ in range(50)])
            again = await chain.get_signature("m", "v1")  # within SIGNATURE_TTL: the kept answer
            for c in chain.sources:
                await c.close()
            return relay.asked, origin.asked, sigs, trusts, again
    relay, origin, sigs, trusts, again = asyncio.run(main())
    assert relay == [SIG, TRUST] and origin == []
    assert set(sigs) == set(trusts) == {b'{"envelope": 1}'} and again == b'{"envelope": 1}'


class _Verifier:
    """Accepts only the envelope `good`."""

    def __init__(self, good: bytes):
        self.good = good

    def verify_version(self, envelope: bytes, artifact: str, version: str, manifest_id: str) -> None:
        from fabric.errors import StatementMismatch
        if envelope != self.good:
            raise StatementMismatch("not the signed one")


def _trust(chain: UpstreamChain, sources: list[OriginClient], good: bytes, tmp_path) -> SiteTrust:
    trust = SiteTrust.__new__(SiteTrust)  # only the envelope lookup is under test
    trust.origin, trust.sources, trust.verifier = chain, sources, _Verifier(good)

    async def kept(artifact, version):
        return None
    trust._kept = kept
    return trust


def test_a_trusting_site_takes_the_envelope_through_the_chain_and_the_origin_only_when_it_is_refused(tmp_path):
    async def main(relay_body: bytes):
        async with Counting(relay_body, 0.05) as relay, Counting(b"signed", 0.05) as origin:
            relay_c, origin_c = OriginClient(relay.url), OriginClient(origin.url)
            chain = UpstreamChain([relay_c], origin_c)
            trust = _trust(chain, [relay_c, origin_c], b"signed", tmp_path)
            got = await asyncio.gather(*[trust._version_envelope("m", "v1", "blake3:x") for _ in range(20)])
            for c in (relay_c, origin_c):
                await c.close()
            return got, relay.asked, origin.asked
    got, relay, origin = asyncio.run(main(b"signed"))  # the relay passes the publisher's envelope on
    assert got == [b"signed"] * 20 and relay == [SIG] and origin == []  # 20 asks, one request, none at the origin
    got, relay, origin = asyncio.run(main(b"forged"))  # a relay whose envelope does not verify
    assert got == [b"signed"] * 20 and origin.count(SIG) >= 1  # each source on its own: the origin's verifies


def test_a_relayed_read_whose_first_source_is_unreachable_is_answered_by_the_next():
    """ReadRelay's reads go through the chain: a refused connection is a TransferError, so the
    chain asks the next source (it escaped the chain before, and the child got a 500)."""
    from agents.site.event_relay import ReadRelay
    from bench.simulate import _free_port

    async def main():
        async with Counting(b"unused") as origin:
            app_path = "/v1/artifacts/m/versions"
            dead = OriginClient(f"http://127.0.0.1:{_free_port()}")  # nothing listens there
            live = OriginClient(origin.url)
            chain = UpstreamChain([dead], live)
            reads = ReadRelay(None, chain)
            try:
                return await reads.answer(("versions", "m"), app_path, None, 1.0), origin.asked
            finally:
                for c in (dead, live):
                    await c.close()
    (body, headers), asked = asyncio.run(main())
    assert asked == ["/v1/artifacts/m/versions"] and b'"versions"' in body


def test_a_channel_that_does_not_exist_yet_costs_the_upstream_one_ask_a_second_until_an_event():
    """Sites below a relay ask for a channel until it exists: the upstream's 404 is kept like an
    answer (at most `TTL`), raised afresh to each asker, and dropped by an event about the artifact
    (1000 in-process sites cost the origin 14.6 such 404s a second through the root hub before)."""
    from agents.site.event_relay import TTL, ReadRelay

    async def main():
        async with Counting(None, delay=0.0) as origin:
            client = OriginClient(origin.url)
            reads = ReadRelay(None, UpstreamChain([], client))
            key = ("channel", "m", "prod")
            try:
                codes = []
                for _ in range(5):  # five children asking within TTL
                    with pytest.raises(NotFound) as e:
                        await reads.answer(key, CHANNEL, None, TTL)
                    codes.append(e.value.code)
                within = len(origin.asked)
                reads.forget("m")  # a channel event about m
                with pytest.raises(NotFound):
                    await reads.answer(key, CHANNEL, None, TTL)
                after_event = len(origin.asked)
                await asyncio.sleep(TTL + 0.1)
                with pytest.raises(NotFound):
                    await reads.answer(key, CHANNEL, None, TTL)
                return codes, within, after_event, len(origin.asked)
            finally:
                await client.close()
    codes, within, after_event, after_ttl = asyncio.run(main())
    assert within == 1 and after_event == 2 and after_ttl == 3, (within, after_event, after_ttl)
    assert set(codes) == {"signature_not_found"}  # the upstream's own code, passed on each time
