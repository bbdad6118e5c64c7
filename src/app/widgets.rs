//! Small widgets shared by the panels. Every input gets an accessible label, so tests (and screen readers)
//! find it by name.

use egui::{Response, TextEdit, Ui};

/// Gives a widget an accessible name of its own (when its visible text is not unique, e.g. a row's button).
pub fn name_widget(r: &Response, role: egui::Role, name: String) {
    r.widget_info(|| egui::WidgetInfo::labeled(role, true, name.clone()));
}

/// A menu button listing `recent` paths (disabled when there are none); the one clicked, if any.
pub fn recent_menu(ui: &mut Ui, label: &str, recent: &[String]) -> Option<std::path::PathBuf> {
    let mut chosen = None;
    ui.add_enabled_ui(!recent.is_empty(), |ui| {
        ui.menu_button(label, |ui| {
            for r in recent {
                if ui.button(r).clicked() {
                    chosen = Some(std::path::PathBuf::from(r));
                }
            }
        });
    });
    chosen
}

/// A label followed by a single-line text field named by it.
pub fn labeled_text(ui: &mut Ui, label: &str, value: &mut String, width: f32) -> Response {
    let l = ui.label(label);
    ui.add(TextEdit::singleline(value).desired_width(width))
        .labelled_by(l.id)
}

/// A label followed by a drag value named by it.
pub fn labeled_drag<N: egui::emath::Numeric>(
    ui: &mut Ui,
    label: &str,
    value: &mut N,
    range: std::ops::RangeInclusive<N>,
) -> Response {
    let l = ui.label(label);
    ui.add(egui::DragValue::new(value).range(range))
        .labelled_by(l.id)
}

/// One row of a two-column `egui::Grid` form: the label (with the tooltip) and a drag value named by it.
/// Returns true when the value changed.
pub fn form_drag<N: egui::emath::Numeric>(
    ui: &mut Ui,
    label: &str,
    tip: &str,
    value: &mut N,
    range: std::ops::RangeInclusive<N>,
    speed: f64,
) -> bool {
    let l = ui.label(label).on_hover_text(tip);
    let r = ui
        .add(egui::DragValue::new(value).range(range).speed(speed))
        .labelled_by(l.id)
        .on_hover_text(tip);
    ui.end_row();
    r.changed()
}

/// A form row for a small positive number best read in scientific notation (learning rates, epsilon).
pub fn form_sci(
    ui: &mut Ui,
    label: &str,
    tip: &str,
    value: &mut f64,
    range: std::ops::RangeInclusive<f64>,
) -> bool {
    let l = ui.label(label).on_hover_text(tip);
    let speed = (value.abs() * 0.01).max(1e-9);
    let r = ui
        .add(
            egui::DragValue::new(value)
                .range(range)
                .speed(speed)
                .custom_formatter(|v, _| format!("{v:.2e}")),
        )
        .labelled_by(l.id)
        .on_hover_text(tip);
    ui.end_row();
    r.changed()
}

/// A form row with a checkbox (the label is the checkbox's own text).
pub fn form_check(ui: &mut Ui, label: &str, tip: &str, value: &mut bool) -> bool {
    ui.label("");
    let r = ui.checkbox(value, label).on_hover_text(tip);
    ui.end_row();
    r.changed()
}

/// A form row with a single-line text field.
pub fn form_text(ui: &mut Ui, label: &str, tip: &str, value: &mut String, width: f32) -> bool {
    let l = ui.label(label).on_hover_text(tip);
    let r = ui
        .add(TextEdit::singleline(value).desired_width(width))
        .labelled_by(l.id)
        .on_hover_text(tip);
    ui.end_row();
    r.changed()
}

/// A form row with a drop-down of named choices.
pub fn form_combo<T: PartialEq + Copy>(
    ui: &mut Ui,
    label: &str,
    tip: &str,
    value: &mut T,
    choices: &[(T, &str)],
) -> bool {
    let l = ui.label(label).on_hover_text(tip);
    let current = choices
        .iter()
        .find(|(v, _)| v == value)
        .map_or("", |(_, name)| *name);
    let mut changed = false;
    egui::ComboBox::from_id_salt(label)
        .selected_text(current)
        .show_ui(ui, |ui| {
            for (v, name) in choices {
                if ui.selectable_label(v == value, *name).clicked() && v != value {
                    *value = *v;
                    changed = true;
                }
            }
        })
        .response
        .labelled_by(l.id)
        .on_hover_text(tip);
    ui.end_row();
    changed
}

/// A single-line field editing a path in place (an empty field is an empty path).
pub fn path_field(ui: &mut Ui, label: &str, path: &mut std::path::PathBuf, width: f32) -> Response {
    let mut text = path.to_string_lossy().into_owned();
    let r = labeled_text(ui, label, &mut text, width);
    if r.changed() {
        *path = std::path::PathBuf::from(text);
    }
    r
}

/// Bytes as GiB (or MiB below one GiB) for people.
pub fn bytes(b: u64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    let b = b as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.0} MiB", b / (1024.0 * 1024.0))
    }
}

/// Seconds as "1 h 02 min", "3 min 05 s" or "12 s".
pub fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}
