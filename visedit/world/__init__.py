"""The synthetic visual-knowledge world: entities, renderer, questions and MMEdit-schema edit datasets."""

from .dataset import (CAPTION_PROMPT, SCENE_SPEC, TASKS, DatasetSpec, EditRecord, MalformedRecordError, load_mmedit,
                      load_world_split, make_edit_dataset, record_task, split_pairs, spread)
from .entities import FACTS, NONVISUAL_FACTS, VISUAL_FACTS, Entity, World, make_world
from .questions import HELDOUT_TEMPLATES, TEXT_FACTS, TEXT_TEMPLATES, TRAIN_TEMPLATES, image_question, text_question
from .render import Rendering, render
from .scene import (SCENE_HELDOUT_TEMPLATES, SCENE_TEMPLATES, SceneRendering, askable, caption, render_scene,
                    scene_question, selectors)

__all__ = ["CAPTION_PROMPT", "TASKS", "record_task", "SCENE_SPEC", "DatasetSpec", "EditRecord", "MalformedRecordError", "load_mmedit", "load_world_split", "spread",
           "make_edit_dataset", "split_pairs", "FACTS", "NONVISUAL_FACTS", "VISUAL_FACTS", "Entity", "World",
           "make_world", "HELDOUT_TEMPLATES", "TEXT_FACTS", "TEXT_TEMPLATES", "TRAIN_TEMPLATES",
           "image_question", "text_question", "Rendering", "render", "SCENE_HELDOUT_TEMPLATES", "SCENE_TEMPLATES",
           "SceneRendering", "askable", "caption", "render_scene", "scene_question", "selectors"]
