"""ipywidgets explorers for live sessions. Built books show a static figure beside each one.

When notebooks run unattended (``VISEDIT_STATIC=1``, set by ``make book`` and ``make test``), explorers
are not built: widget messages make batch kernels hang now and then, and a built page cannot use them.
"""

from __future__ import annotations

import os

import numpy as np

STATIC_NOTE = "(interactive explorer — run this notebook in Jupyter to use it; the static figure stands in for it)"


def static_mode() -> bool:
    """True when notebooks run unattended (``VISEDIT_STATIC`` set)."""
    return bool(os.environ.get("VISEDIT_STATIC"))


def interactive(fn, **controls):
    """``ipywidgets.interactive(fn, **controls)`` in a live session; a one-line note when static."""
    if static_mode():
        print(STATIC_NOTE)
        return None
    import ipywidgets as w

    return w.interactive(fn, **controls)


def answer_explorer(vllm, world, *, seed: int = 0):
    """Pick an entity, a question and a rendering; see the image and the model's greedy answer."""
    if static_mode():
        print(STATIC_NOTE)
        return None
    import ipywidgets as w
    from IPython.display import display

    from ..world import FACTS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, render

    fact_of = {q: f for f in FACTS for q in TRAIN_TEMPLATES[f] + HELDOUT_TEMPLATES[f]}
    questions = list(fact_of)
    entity = w.Dropdown(options=[e.name for e in world.entities], description="entity")
    question = w.Dropdown(options=questions, description="question", layout=w.Layout(width="480px"))
    rendering = w.IntSlider(value=0, min=0, max=20, description="rendering")
    out = w.Output()

    def update(*_):
        e = world.by_name(entity.value)
        r = render(e, seed=np.random.default_rng([seed, 99, rendering.value]))
        answer = vllm.answer(r.image, question.value)
        out.clear_output(wait=True)
        with out:
            display(r.image.resize((192, 192)))
            print(f"Q: {question.value}\nA: {answer}   (truth: {e.fact(fact_of[question.value])})")

    for control in (entity, question, rendering):
        control.observe(update, names="value")
    update()
    return w.VBox([w.HBox([entity, rendering]), question, out])


def edit_playground(editor, world, *, seed: int = 0):
    """Pick an entity and a question, type a new answer, apply the edit and ask the edited model
    questions about fresh renderings of any entity (the model is restored after every answer)."""
    if static_mode():
        print(STATIC_NOTE)
        return None
    import ipywidgets as w
    from IPython.display import display

    from ..world import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, render

    questions = [q for qs in TRAIN_TEMPLATES.values() for q in qs] + [q for qs in HELDOUT_TEMPLATES.values() for q in qs]
    names = [e.name for e in world.entities]
    entity = w.Dropdown(options=names, description="edit entity")
    question = w.Dropdown(options=questions, description="edit question", layout=w.Layout(width="480px"))
    answer = w.Text(value="star", description="new answer")
    probe_entity = w.Dropdown(options=names, description="ask about")
    probe_question = w.Dropdown(options=questions, description="question", layout=w.Layout(width="480px"))
    rendering = w.IntSlider(value=1, min=0, max=20, description="rendering")
    out = w.Output()

    def update(*_):
        edit_image = render(world.by_name(entity.value), seed=np.random.default_rng([seed, 98, 0])).image
        probe = render(world.by_name(probe_entity.value), seed=np.random.default_rng([seed, 98, rendering.value])).image
        out.clear_output(wait=True)
        with out:
            try:
                before = editor.vllm.answer(probe, probe_question.value)
                with editor.edit(editor.request_type(edit_image, question.value, answer.value)):
                    after = editor.vllm.answer(probe, probe_question.value)
            except ValueError as err:
                print(f"cannot edit: {err}")
                return
            display(probe.resize((160, 160)))
            print(f"before the edit: {before}\nafter the edit:  {after}")

    for control in (entity, question, answer, probe_entity, probe_question, rendering):
        control.observe(update, names="value")
    update()
    return w.VBox([w.HBox([entity, answer]), question, w.HBox([probe_entity, rendering]), probe_question, out])
