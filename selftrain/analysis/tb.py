"""Read scalars back from TensorBoard event files (for the demo summary, reports and tests)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalar_events(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar point under a log dir as TensorBoard shows it, duplicates included.

    The event files are read in order as one run, as TensorBoard reads them: a resumed run's
    file starts with a purge at its checkpoint's step, which drops what the killed process
    logged from that step on.

    Args:
        logdir: a directory holding ``events.out.tfevents.*`` files (a resumed run adds more).

    Returns:
        tag -> [(step, value), ...] in the order logged.
    """
    if not any(Path(logdir).glob("events.out.tfevents.*")):
        return {}
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series under a log dir, sorted by step (:func:`scalar_events`, one per step).

    Args:
        logdir: a directory holding ``events.out.tfevents.*`` files.

    Returns:
        tag -> [(step, value), ...]; a step logged twice keeps the later value.
    """
    return {tag: sorted(dict(points).items())
            for tag, points in scalar_events(logdir).items()}


def read_layout(logdir: str | Path) -> dict[str, list[str]]:
    """The custom-scalars layout written into a run: chart title -> tag regexes.

    Args:
        logdir: a directory holding ``events.out.tfevents.*`` files.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    charts: dict[str, list[str]] = {}
    for event_file in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(event_file)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "custom_scalars":
                    continue
                layout = layout_pb2.Layout()
                layout.ParseFromString(value.tensor.string_val[0])
                for category in layout.category:
                    for chart in category.chart:
                        charts[chart.title] = list(chart.multiline.tag)
    return charts
