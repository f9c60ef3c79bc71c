"""The module's .ui file and its code agree: every ``self.ui.<name>`` the module uses exists in HSAMSlicer.ui with a
class that has the methods and signals the code calls, and every SlicerParameterName binds to a parameter of a
matching type. Parsed statically (xml + ast): Qt is not available outside Slicer.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from collections import defaultdict

from conftest import REPOSITORY

UI_FILE = REPOSITORY / "Resources" / "UI" / "HSAMSlicer.ui"
MODULE_FILE = REPOSITORY / "HSAMSlicer" / "HSAMSlicer.py"
GUI_FILES = [MODULE_FILE, *sorted((REPOSITORY / "HSAMSlicer" / "HSAMSlicerGUI").glob("*.py"))]  # the panel sections

# What the module may do with a widget of each class (methods, properties and signals it touches).
COMMON = {"enabled", "text", "toolTip", "show", "hide", "setStyleSheet", "blockSignals", "visible"}
ALLOWED = {
    "QPushButton": COMMON | {"clicked(bool)", "setText", "setEnabled"},
    "QComboBox": COMMON | {"addItem", "clear", "count", "currentIndex", "findData", "itemData", "setCurrentIndex",
                           "setItemData", "currentIndexChanged(int)"},  # fmt: skip
    "QListWidget": COMMON | {"addItem", "clear", "count", "item", "itemChanged(QListWidgetItem*)"},
    "QProgressBar": COMMON | {"setRange", "setValue", "setFormat"},
    "QLabel": COMMON | {"setText"},
    "QCheckBox": COMMON | {"checked", "toggled(bool)"},
    "qMRMLNodeComboBox": COMMON | {"currentNode", "setCurrentNode", "currentNodeChanged(vtkMRMLNode*)"},
    "ctkPathLineEdit": COMMON | {"currentPath", "setCurrentPath"},
    "ctkCollapsibleButton": COMMON | {"collapsed"},
    "QDoubleSpinBox": COMMON | {"value", "setValue", "setRange"},
}
# SlicerParameterName bindings: widget class -> what the parameter's annotation must be.
BINDABLE = {
    "qMRMLNodeComboBox": lambda annotation: annotation.startswith("vtkMRML"),
    "QCheckBox": lambda annotation: annotation == "bool",
    "ctkPathLineEdit": lambda annotation: annotation in {"pathlib.Path", "Path"},
    "QComboBox": lambda annotation: annotation == "str",
    "QLineEdit": lambda annotation: annotation == "str",
    "QSpinBox": lambda annotation: annotation == "int",
}


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def widget_uses() -> dict[str, set[str]]:
    """{widget name: attributes and connected signals} for every ``self.ui.<name>`` in the module and its sections."""
    uses: dict[str, set[str]] = defaultdict(set)
    for path in GUI_FILES:
        _collect_uses(ast.parse(path.read_text()), uses)
    return uses


def _collect_uses(tree: ast.Module, uses: dict[str, set[str]]) -> None:
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)):
            continue
        owner = node.value
        if not (owner.attr == "ui" and isinstance(owner.value, ast.Name) and owner.value.id == "self"):
            continue
        name = node.attr
        uses[name]  # noqa: B018 (a bare use still counts)
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute):
            call = parents.get(parent)
            if parent.attr == "connect" and isinstance(call, ast.Call) and isinstance(call.args[0], ast.Constant):
                uses[name].add(call.args[0].value)
            else:
                uses[name].add(parent.attr)


def test_every_widget_the_module_uses_exists_with_the_right_class():
    widgets = ui_widgets()
    uses = widget_uses()
    assert len(uses) >= 10, f"the parser found too few widgets: {sorted(uses)}"
    for name, used in sorted(uses.items()):
        assert name in widgets, f"the module uses self.ui.{name}, which HSAMSlicer.ui does not define"
        cls = widgets[name].get("class")
        assert cls in ALLOWED, f"{name} is a {cls}; add what the module may do with a {cls} to ALLOWED"
        unknown = used - ALLOWED[cls] - {"connect"}
        assert not unknown, f"self.ui.{name} is a {cls} in the .ui but the code uses {sorted(unknown)} on it"


def test_required_controls_are_present():
    classes = {name: w.get("class") for name, w in ui_widgets().items()}
    for name, cls in {
        "inputVolumeSelector": "qMRMLNodeComboBox", "modelComboBox": "QComboBox", "importModelButton": "QPushButton",
        "deviceComboBox": "QComboBox", "deviceInfoLabel": "QLabel", "organListWidget": "QListWidget",
        "applyButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
        "reviewButton": "QPushButton", "exportButton": "QPushButton", "exportDirectoryPathLineEdit": "ctkPathLineEdit",
        "finetuneCasesPathLineEdit": "ctkPathLineEdit", "finetuneBaseComboBox": "QComboBox",
        "finetuneEpochsSpinBox": "QSpinBox", "finetuneNameLineEdit": "QLineEdit", "finetuneButton": "QPushButton",
        "promptSegmentComboBox": "QComboBox", "promptBoxButton": "QPushButton", "promptPositiveButton": "QPushButton",
        "promptNegativeButton": "QPushButton", "propagateButton": "QPushButton", "promptUndoButton": "QPushButton",
        "promptLimitCheckBox": "QCheckBox", "promptFromSpinBox": "QDoubleSpinBox", "promptToSpinBox": "QDoubleSpinBox",
        "promptStatusLabel": "QLabel",
    }.items():  # fmt: skip
        assert classes.get(name) == cls, f"{name}: expected {cls}, found {classes.get(name)}"


def parameter_annotations() -> dict[str, str]:
    tree = ast.parse(MODULE_FILE.read_text())
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert not future, "parameterNodeWrapper needs evaluated annotations: no 'from __future__ import annotations'"
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "HSAMSlicerParameterNode":
            assert any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
            return {
                stmt.target.id: ast.unparse(stmt.annotation)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    raise AssertionError("HSAMSlicerParameterNode is missing")


def test_slicer_parameter_names_bind_to_parameters_of_a_matching_type():
    annotations = parameter_annotations()
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.findtext("string")
                cls = widget.get("class")
                assert parameter in annotations, f"{name} binds to '{parameter}', not a HSAMSlicerParameterNode field"
                assert cls in BINDABLE and BINDABLE[cls](annotations[parameter]), (
                    f"{name} ({cls}) cannot bind to {parameter}: {annotations[parameter]}"
                )
                bound[parameter] = widget
    assert {"inputVolume", "outputSegmentation", "createConfidence", "exportDirectory", "finetuneCases",
            "finetuneEpochs", "finetuneModelName"} <= set(bound)
    # a node selector offers exactly the node class its parameter holds
    for parameter in ("inputVolume", "outputSegmentation"):
        types = [s.text for s in bound[parameter].iter("string") if s.text and s.text.startswith("vtkMRML")]
        assert types == [annotations[parameter]], f"{parameter}: selector offers {types}"


def test_ui_file_declares_its_custom_widgets_and_scene_connections():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if not c.startswith("Q")} <= declared
    receivers = {
        c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors <= receivers, "every node selector must receive the scene"


def test_sample_data_checksum_matches_the_real_sample(real_data):
    """The tutorial's sample CT is registered with the SHA-256 of the real file."""
    import hashlib

    values = {
        node.targets[0].id: node.value.value
        for node in ast.parse(MODULE_FILE.read_text()).body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }
    digest = hashlib.sha256((real_data / "totalsegmentator" / "example_ct_sm.nii.gz").read_bytes()).hexdigest()
    assert values["SAMPLE_SHA256"] == digest
