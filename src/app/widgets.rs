//! Small widgets shared by the panels. Every input gets an accessible label, so tests (and screen readers)
//! find it by name.

use crate::schema::{Bound, Field, Number};
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

/// A number the form edits as text.
pub trait FormNumber: Copy + PartialEq + std::str::FromStr + Into<Number> {
    /// How the value is written into its field.
    fn show(self) -> String;
}

macro_rules! whole_numbers {
    ($($t:ty),*) => {$(impl FormNumber for $t { fn show(self) -> String { self.to_string() } })*};
}
whole_numbers!(u32, u64, usize);

impl FormNumber for f64 {
    fn show(self) -> String {
        crate::schema::show_real(self)
    }
}

/// Problems with what was typed into a form, by the label on screen; any of them blocks Start. An entry stays
/// while its field is out of sight (a collapsed section) and goes when the field holds a valid value again.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FormErrors(std::collections::BTreeMap<String, String>);

impl FormErrors {
    pub fn first(&self) -> Option<&str> {
        self.0.values().next().map(String::as_str)
    }

    /// Forgets every entry and what the fields held: the config was replaced (a preset, an import).
    pub fn reset(&mut self, ctx: &egui::Context) {
        self.0.clear();
        ctx.data_mut(|d| d.remove_by_type::<TypedNumber>());
    }
}

/// A number field's text while it is edited, and the value it last showed (to notice changes from elsewhere).
#[derive(Clone, Default)]
struct TypedNumber {
    text: String,
    shown: String,
}

/// A text field editing `value`: what the user types stays on screen, and a value that does not parse or that
/// `bound` does not admit is reported in `errors` under `label` (and left out of `value`) instead of being
/// corrected. Returns true when `value` changed.
pub fn number_field<N: FormNumber>(
    ui: &mut Ui,
    label: &str,
    value: &mut N,
    bound: Bound,
    errors: &mut FormErrors,
    width: f32,
) -> Response {
    let id = ui.scope_id().with(("number", label));
    let current = value.show();
    let mut typed = ui
        .data(|d| d.get_temp::<TypedNumber>(id))
        .filter(|t| t.shown == current)
        .unwrap_or_else(|| TypedNumber {
            text: current.clone(),
            shown: current.clone(),
        });
    let invalid = errors.0.contains_key(label);
    let mut edit = TextEdit::singleline(&mut typed.text).desired_width(width);
    if invalid {
        edit = edit.text_color(ui.visuals().error_fg_color);
    }
    let mut r = ui.add(edit);
    if r.changed() || !typed.text.trim().eq(current.as_str()) {
        match typed.text.trim().parse::<N>() {
            Ok(n) if bound.admits(n.into()) => {
                errors.0.remove(label);
                if n != *value {
                    *value = n;
                    typed.shown = n.show();
                    r.mark_changed();
                }
            }
            _ => {
                errors.0.insert(
                    label.to_owned(),
                    format!(
                        "{label}: \"{}\" is not valid; enter {}.",
                        typed.text.trim(),
                        bound.describe()
                    ),
                );
            }
        }
    } else {
        errors.0.remove(label);
    }
    if let Some(e) = errors.0.get(label) {
        r = r.on_hover_text(e);
    }
    ui.data_mut(|d| d.insert_temp(id, typed));
    r
}

/// One row of a two-column `egui::Grid` form: the field's label (with the tooltip, which adds what the field
/// admits) and a number field named by it. Returns true when the value changed.
pub fn form_number<N: FormNumber>(
    ui: &mut Ui,
    field: &Field,
    tip: &str,
    value: &mut N,
    errors: &mut FormErrors,
) -> bool {
    let tip = with_bound(tip, field);
    let l = ui.label(field.label).on_hover_text(&tip);
    let r = number_field(ui, field.label, value, field.bound(), errors, 120.0)
        .labelled_by(l.id)
        .on_hover_text(&tip);
    ui.end_row();
    r.changed()
}

/// `tip` followed by what `field` admits.
pub fn with_bound(tip: &str, field: &Field) -> String {
    format!("{tip}\nAllowed: {}.", field.bound().describe())
}

/// A form row with a checkbox (the label is the checkbox's own text).
pub fn form_check(ui: &mut Ui, label: &str, tip: &str, value: &mut bool) -> bool {
    ui.label("");
    let r = ui.checkbox(value, label).on_hover_text(tip);
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

/// 1.23 M, 860 M, 1.1 G.
pub fn si(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} k", n / 1e3)
    } else {
        format!("{n}")
    }
}
