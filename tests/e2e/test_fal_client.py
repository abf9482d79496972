"""The real PyPI fal-client against the sidecar's queue host (gen C).

fal-client builds URLs from module globals at call time (fal_client.client.
QUEUE_URL_FORMAT / RUN_URL_FORMAT, forced https by default), reads the key from
FAL_KEY, then follows the response_url/status_url/cancel_url the server returns
verbatim. Submit: POST {QUEUE_URL_FORMAT}{app}[/{path}][?fal_webhook=...];
status: GET status_url?logs=true|false; result: GET response_url; cancel: PUT cancel_url.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import fal_client
import fal_client.client as fal_client_module
import pytest

from helpers import new_key

APP_ID = "test/app"


@pytest.fixture
def fal(monkeypatch, sidecar):
    monkeypatch.setenv("FAL_KEY", "e2e-key-id:e2e-key-secret")
    monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{sidecar.queue_url}/")
    monkeypatch.setattr(fal_client_module, "RUN_URL_FORMAT", f"{sidecar.run_url}/")
    client = fal_client.SyncClient()
    yield client
    client._client.close()


def _messages(logs):
    return [(item["message"].rstrip("\n"), item["level"]) for item in logs or []]


def test_subscribe_with_logs_and_result(fal, sidecar):
    updates = []
    enqueued = []
    result = fal.subscribe(
        APP_ID,
        {"lines": 3},
        path="logs",
        with_logs=True,
        on_enqueue=enqueued.append,
        on_queue_update=updates.append,
        interval=0.05,
        client_timeout=30,
    )
    assert result == {"printed": 3}
    assert len(enqueued) == 1 and enqueued[0]
    assert updates, "on_queue_update was never called"
    final = updates[-1]
    assert isinstance(final, fal_client.Completed), updates
    assert isinstance(final.logs, list), final
    msgs = _messages(final.logs)
    assert ("log line 0", "STDOUT") in msgs, msgs
    assert ("log line 2", "STDOUT") in msgs, msgs
    assert ("warning on stderr", "STDERR") in msgs, msgs
    for item in final.logs:
        assert set(item) >= {"message", "level", "source", "timestamp"}, item
        assert item["source"] == "USER", item
        datetime.fromisoformat(item["timestamp"].replace("Z", "+00:00"))  # ISO-8601
    # order of stdout lines is preserved
    stdout = [m for m, lvl in msgs if m.startswith("log line")]
    assert stdout == sorted(stdout, key=lambda m: int(m.split()[-1])), stdout
    assert isinstance(final.metrics, dict) and "inference_time" in final.metrics, final.metrics


def test_iter_events_and_status_codes(fal, sidecar):
    handle = fal.submit(APP_ID, {"seconds": 0.6}, path="slow")
    assert handle.request_id
    seen = []
    for event in handle.iter_events(with_logs=False, interval=0.05):
        seen.append(event)
    kinds = [type(e).__name__ for e in seen]
    assert kinds[-1] == "Completed", kinds
    assert "InProgress" in kinds, kinds
    for e in seen:
        if isinstance(e, fal_client.InProgress):
            assert e.logs is None, "logs must be null when with_logs=False"
        if isinstance(e, fal_client.Queued):
            assert isinstance(e.position, int) and e.position >= 0
    done = seen[-1]
    assert done.error is None, done
    assert isinstance(done.metrics.get("inference_time"), (int, float)), done.metrics
    assert done.metrics["inference_time"] > 0
    assert handle.get() == {"slept": 0.6}

    # status by id through the client's own URL construction (from_request_id)
    status = fal.status(APP_ID, handle.request_id, with_logs=True)
    assert isinstance(status, fal_client.Completed)
    assert isinstance(status.logs, list)
    assert any(m.startswith("slow: starting") for m, _ in _messages(status.logs)), status.logs
    assert fal.result(APP_ID, handle.request_id) == {"slept": 0.6}


def test_queued_position_through_client(monkeypatch, serial_sidecar):
    monkeypatch.setenv("FAL_KEY", "e2e-key")
    monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{serial_sidecar.queue_url}/")
    client = fal_client.SyncClient()
    busy = client.submit(APP_ID, {"seconds": 10}, path="slow")
    serial_sidecar.wait_running_in_app("/slow", busy.request_id)
    queued = client.submit(APP_ID, {"x": 1}, path="echo")
    status = queued.status()
    assert isinstance(status, fal_client.Queued), status
    assert status.position == 0
    assert isinstance(busy.status(), fal_client.InProgress)
    busy.cancel()
    assert queued.get()["json"] == {"x": 1}
    client._client.close()


def test_cancel_running_and_completed(fal, sidecar):
    handle = fal.submit(APP_ID, {"seconds": 10}, path="slow")
    sidecar.wait_running_in_app("/slow", handle.request_id)
    handle.cancel()  # 202 CANCELLATION_REQUESTED; raises on non-2xx
    sidecar.wait_app_saw("/slow/cancel", handle.request_id)
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        handle.get()
    assert info.value.status_code == 499
    status = handle.status()
    assert isinstance(status, fal_client.Completed)

    # cancelling a completed request is an error (400 ALREADY_COMPLETED)
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        handle.cancel()
    assert info.value.status_code == 400


def test_custom_headers_reach_the_app(fal, sidecar):
    handle = fal.submit(APP_ID, {"a": [1, 2]}, path="echo", headers={"X-Custom-Thing": "yes"},
                        hint="gpu-1", priority="normal")
    out = handle.get(interval=0.05)
    assert out["method"] == "POST"
    assert out["path"] == "/echo"
    assert out["json"] == {"a": [1, 2]}
    assert out["headers"].get("x-custom-thing") == "yes"
    assert out["headers"].get("x-fal-request-id") == handle.request_id
    assert out["headers"].get("content-type", "").startswith("application/json")


def test_submit_with_webhook_url(fal, sidecar, receiver):
    handle = fal.submit(APP_ID, {"hello": "hook"}, path="test", webhook_url=receiver.url("/fal-client"))
    result = handle.get(interval=0.05)
    assert result == {"message": "Hello from fal-serverless!", "input": {"hello": "hook"}}
    delivery = receiver.wait_for(handle.request_id)
    assert delivery.path == "/fal-client"
    body = delivery.json
    assert body["status"] == "OK"
    assert body["request_id"] == handle.request_id
    assert body["payload"] == result


def test_async_client(monkeypatch, sidecar):
    monkeypatch.setenv("FAL_KEY", "e2e-async-key")
    monkeypatch.setattr(fal_client_module, "QUEUE_URL_FORMAT", f"{sidecar.queue_url}/")

    async def main():
        client = fal_client.AsyncClient()
        handle = await client.submit(APP_ID, {"lines": 2}, path="logs")
        events = []
        async for event in handle.iter_events(with_logs=True, interval=0.05):
            events.append(event)
        result = await handle.get(interval=0.05)
        status = await client.status(APP_ID, handle.request_id, with_logs=False)
        key = new_key("async")
        sub = await client.subscribe(APP_ID, {"key": key, "fail": 0}, path="flaky", interval=0.05)
        await (await client._client).aclose()
        return events, result, status, sub

    events, result, status, sub = asyncio.run(main())
    assert result == {"printed": 2}
    assert isinstance(events[-1], fal_client.Completed)
    msgs = _messages(events[-1].logs)
    assert ("log line 0", "STDOUT") in msgs, msgs
    assert isinstance(status, fal_client.Completed) and status.logs is None
    assert sub == {"calls": 1}


def test_status_unknown_request_raises_404(fal):
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal.status(APP_ID, "00000000-0000-4000-8000-000000000000")
    assert info.value.status_code == 404


def test_submit_error_is_json_detail(fal, sidecar):
    # a refused webhook is a gateway-made 400; the client surfaces its detail
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal.submit(APP_ID, {}, path="echo", webhook_url="http://169.254.169.254/latest/meta-data")
    assert info.value.status_code == 400
    detail = info.value.response.json().get("detail")
    assert detail and info.value.message == detail


def test_result_of_failing_app_raises_with_app_status(fal, sidecar):
    handle = fal.submit(APP_ID, {"status": 422}, path="fail")
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        handle.get(interval=0.05)
    assert info.value.status_code == 422
    assert info.value.message == "failing on purpose with 422"
    assert isinstance(handle.status(), fal_client.Completed)
