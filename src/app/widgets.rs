//! Small widgets shared by the panels. Every input gets an accessible label, so tests (and screen readers)
//! find it by name.

use egui::{Response, TextEdit, Ui};

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
