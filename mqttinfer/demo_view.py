"""What ``mqttinfer demo`` shows: a live rich view on a terminal, plain lines elsewhere.

The runner (``mqttinfer.demo``) writes a :class:`DemoState`; the live view redraws it four times
a second from rich's refresh thread, so everything here only reads (tallies lock themselves,
events are copied under a lock). Without a terminal (CI, pipes, ``--json``) the same events are
printed as lines, one per event, so a log reads like the live view's history.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mqttinfer.demo_tally import PhaseSummary, PhaseTally

_EVENTS_SHOWN = 6
_STATE_STYLES = {
    "ready": "green",
    "starting": "yellow",
    "loading": "yellow",
    "offline": "red",
    "killed": "bold red",
}


@dataclass(frozen=True, slots=True)
class DeviceLine:
    """One device as the view shows it: ``state`` is ready, starting, offline or killed."""

    device: str
    group: str
    partition: int
    state: str


class DemoState:
    """The view model: title lines, phases and their tallies, device states, recent events."""

    def __init__(
        self,
        title: str,
        details: Sequence[str],
        phases: Sequence[tuple[str, str]],
        frames_per_phase: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.title = title
        self.details = list(details)
        self.phases = list(phases)
        self.frames_per_phase = frames_per_phase
        self.clock = clock
        self.tallies: dict[str, PhaseTally] = {}
        self.current: str | None = None
        self.caption = ""
        self.devices: Callable[[], list[DeviceLine]] = list
        self.echo: Callable[[str, str], None] | None = None
        self._events: deque[tuple[str, str, str]] = deque(maxlen=_EVENTS_SHOWN)
        self._lock = threading.Lock()

    def event(self, text: str, style: str = "") -> None:
        """Record one thing that happened (and print it when the view prints lines)."""
        stamp = time.strftime("%H:%M:%S")
        with self._lock:
            self._events.append((stamp, text, style))
        if self.echo is not None:
            self.echo(f"{stamp} {text}", style)

    def events(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return list(self._events)

    def summaries(self) -> dict[str, PhaseSummary]:
        now = self.clock()
        return {
            key: tally.summary(now if key == self.current else None)
            for key, tally in self.tallies.items()
        }


# --------------------------------------------------------------------------- rendering
def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.1f} %"


def phase_table(
    state: DemoState, summaries: dict[str, PhaseSummary], recorded: float | None
) -> Table:
    """One row per phase: frames, results, accuracy, latency, degraded (partitions), lost."""
    caption = (
        None
        if recorded is None
        else f"the bundle's recorded accuracy on the first 1000 test images: {_percent(recorded)}"
    )
    table = Table(title=None, caption=caption, expand=False, pad_edge=False)
    table.add_column("phase", no_wrap=True)
    for name in (
        "frames",
        "results",
        "accuracy",
        "p50 ms",
        "p99 ms",
        "degraded",
        "missing",
        "lost",
    ):
        table.add_column(name, justify="right", no_wrap=True)
    for key, title in state.phases:
        summary = summaries.get(key)
        if summary is None:
            table.add_row(Text(title, style="dim"), *["" for _ in range(8)])
            continue
        running = key == state.current
        label = Text(title + (" …" if running else ""), style="bold" if running else "")
        missing = ",".join(f"p{p}" for p in summary.missing_partitions)
        table.add_row(
            label,
            str(summary.frames),
            str(summary.results),
            _percent(summary.accuracy),
            _ms(summary.p50_ms),
            _ms(summary.p99_ms),
            Text(str(summary.degraded), style="yellow" if summary.degraded else ""),
            Text(missing, style="yellow"),
            Text(str(summary.lost), style="bold red" if summary.lost else ""),
        )
    return table


def _devices_line(devices: list[DeviceLine]) -> Text:
    line = Text("devices: ")
    online = sum(1 for d in devices if d.state == "ready")
    group = None
    for device in devices:
        if group is not None and device.group != group:
            line.append("│ ", style="dim")
        group = device.group
        line.append(f"{device.device} ", style="bold")
        line.append(f"{device.state}  ", style=_STATE_STYLES.get(device.state, ""))
    line.append(f"({online}/{len(devices)} online)", style="dim")
    return line


def render(state: DemoState, recorded: float | None) -> RenderableType:
    """The whole live view."""
    parts: list[RenderableType] = [Text(state.title, style="bold")]
    parts += [Text(line, style="dim") for line in state.details]
    summaries = state.summaries()
    current = summaries.get(state.current or "")
    if current is not None:
        done = current.results + current.lost
        parts.append(Text(""))
        parts.append(Text(state.caption, style="bold cyan"))
        parts.append(
            Group(
                ProgressBar(total=max(1, state.frames_per_phase), completed=done, width=50),
                Text(
                    f"{done}/{state.frames_per_phase} answered · {current.in_flight} in flight"
                    f" · {current.fps or 0.0:.0f} results/s",
                    style="dim",
                ),
            )
        )
    parts.append(Text(""))
    parts.append(phase_table(state, summaries, recorded))
    parts.append(_devices_line(state.devices()))
    for stamp, text, style in state.events():
        parts.append(Text(f"{stamp} {text}", style=style or "dim"))
    return Group(*parts)


@contextmanager
def live_view(state: DemoState, console: Console, recorded: float | None) -> Iterator[DemoState]:
    """A rich Live view on a terminal; plain event lines on anything else."""
    if not console.is_terminal:

        def echo(text: str, style: str) -> None:
            console.print(Text(text, style=style), soft_wrap=True)

        state.echo = echo
        for line in [state.title, *state.details]:
            console.print(line, soft_wrap=True, highlight=False)
        try:
            yield state
        finally:
            state.echo = None
        return
    with Live(
        get_renderable=lambda: render(state, recorded),
        console=console,
        refresh_per_second=4,
        transient=True,
    ):
        yield state
