"""The etcd transport (vdsm_ft.etcd) on its own (tests/integration/test_arbiter*.py run a
real etcd)."""
import base64

from vdsm_ft import etcd


def test_txn_decoding_handles_omitted_fields():
    # proto3 JSON leaves out empty kvs, zero leases and false booleans.
    k, v = base64.b64encode(b"/k").decode(), base64.b64encode(b"7").decode()
    result = {"header": {"revision": "9"}, "responses": [
        {"response_range": {"header": {}}},
        {"response_range": {"kvs": [{"key": k, "value": v, "mod_revision": "8"}],
                            "count": "1"}},
        {"response_put": {"header": {}}}]}
    empty, kv = etcd.ranges(result)
    assert empty is None
    assert (kv.key, kv.value, kv.mod_revision, kv.lease) == (b"/k", b"7", 8, 0)
