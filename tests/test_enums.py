"""edge/enums.py: a state that is an enum reads, prints and serialises as the string it was."""

from __future__ import annotations

import json
import sqlite3

from edge.install import STAGE_GOLDEN, InstallResult, InstallStage
from edge.ota_wire import OtaStatePayload


def test_install_stages_print_and_serialise_as_their_strings() -> None:
    stage = InstallStage.GOLDEN
    assert stage == "golden" and STAGE_GOLDEN is stage and InstallStage("golden") is stage
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
