"""edge/enums.py: a state that is an enum reads, prints and serialises as the string it was."""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import asdict, replace

import pytest

from edge.capture import CameraPhase, CameraState
from edge.install import InstallResult, InstallStage
from edge.ota_wire import OtaStatePayload


def test_install_stages_print_and_serialise_as_their_strings() -> None:
    stage = InstallStage.GOLDEN
    assert stage == "golden" and InstallStage("golden") is stage
    assert (str(stage), f"{stage}", f"{stage:>8}") == ("golden", "golden", "  golden")
    assert "%s" % stage == "golden"  # noqa: UP031 - the logging calls format this way
    assert json.dumps({"stage": stage}) == '{"stage": "golden"}'
    assert sqlite3.connect(":memory:").execute("SELECT ?", (stage,)).fetchone() == ("golden",)
    result = InstallResult(ok=False, stage=InstallStage.CHECKSUM, reason="x")
    assert f"refused at {result.stage}" == "refused at checksum"


def test_a_stage_in_an_ota_state_message_is_the_plain_string() -> None:
    fields = {"v": 1, "device_id": "d1", "state": "failed", "ts": 1.0}
    plain = OtaStatePayload.model_validate({**fields, "stage": "golden"})
    as_enum = OtaStatePayload.model_validate({**fields, "stage": InstallStage.GOLDEN})
    assert as_enum.model_dump_json() == plain.model_dump_json()
    assert type(as_enum.stage) is str


def test_the_ota_client_stages_are_install_stages() -> None:
    # edge/ota.py reports these around install_bundle's own stages.
    assert [InstallStage(name) for name in ("desired", "transfer", "health")] == [
        InstallStage.DESIRED, InstallStage.TRANSFER, InstallStage.HEALTH,
    ]
    assert list(InstallStage)[0] is InstallStage.DESIRED and list(InstallStage)[-1] is InstallStage.HEALTH


def test_camera_phases_are_the_strings_status_and_the_operator_page_read() -> None:
    assert [str(phase) for phase in CameraPhase] == ["starting", "up", "down", "ended", "stopped"]
    state = CameraState(state=CameraPhase.DOWN, since=1.0, down_since=1.0, reconnects=2, frames=3, dropped=0,
                        bad_frames=0, last_error="unplugged", source="usb-cam", fps=0.0)
    as_string = replace(state, state="down")  # type: ignore[arg-type] - what the status carried before the enum
    assert json.dumps(asdict(state)) == json.dumps(asdict(as_string))
    assert state.state in ("up", "down", "ended") and {"down": 1}[state.state] == 1


def test_a_camera_phase_logs_as_its_value(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("camera %s: %s -> %s", "cam", CameraPhase.STARTING, CameraPhase.UP)
    assert caplog.messages == ["camera cam: starting -> up"]
