"""The launchers' summary (test/common.sh's report): reads main.py's summary JSON, writes <CaseName>.log as
`Key = value` lines and prints the final block.

usage: summary.py SUMMARY_JSON CASE_LOG KIND NETWORK CASE_NAME E2E_SECONDS
"""

import json
import platform
import sys


def fixed(value, digits):
    return "None" if value is None else f"{value:.{digits}f}"


def case_fields(s, kind, network, case_name, e2e):
    """The (key, value) lines of <CaseName>.log, in order."""
    # The final Acc@1 main.py reports: validation when there was one (eval runs: only that), else training.
    accuracy = s["val_acc1"] if s.get("val_acc1") is not None else s.get("train_acc1")
    loss = s.get("val_loss") if kind == "eval" else s.get("train_loss")
    fields = [
        ("Network", network),
        ("RankSize", s["world_size"]),
        ("BatchSize", s["batch_size"]),
        ("DeviceType", platform.machine()),
        ("CaseName", case_name),
    ]
    if kind != "eval":
        # Mean over the measured window; none when every epoch was shorter than main.py's FPS warm-up.
        fps = step_ms = None
        if s.get("measured_steps") and s.get("measured_seconds"):
            fps = s["measured_images"] / s["measured_seconds"]
            step_ms = 1000.0 * s["measured_seconds"] / s["measured_steps"]
        fields += [("ActualFPS", fixed(fps, 2)), ("TrainingTime", fixed(step_ms, 2))]
        # The share of the mean step spent waiting for the loader (main.py's data_ms over the whole step), over the
        # measured steps, as the FPS.
        fields += [("DataWaitShare", fixed(s.get("data_wait_share"), 3))]
    return fields + [
        ("TrainAccuracy", fixed(accuracy, 3)),
        ("ActualLoss", fixed(loss, 4)),
        ("E2ETrainingTime", e2e),
        ("Device", s["device_type"]),
    ]


def main(summary_path, case_log, kind, network, case_name, e2e):
    with open(summary_path) as f:
        fields = case_fields(json.load(f), kind, network, case_name, e2e)
    with open(case_log, "w") as f:
        f.writelines(f"{key} = {value}\n" for key, value in fields)

    values = dict(fields)
    print("------------------ Final result ------------------")
    if kind != "eval":
        print(f"Final Performance images/sec : {values['ActualFPS']}")
    print(f"Final Train Accuracy : {values['TrainAccuracy']}")
    print(f"E2E Training Duration sec : {e2e}")
    print(f"Summary : {case_log}")


if __name__ == "__main__":
    main(*sys.argv[1:])
