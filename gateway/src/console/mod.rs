//! The web console at `/ui`: pages rendered from templates embedded in the
//! binary (minijinja), filled in the browser by `console.js` from the same
//! APIs the CLI uses. The pages carry no data and need no key; every call
//! the page makes presents the key the user signed in with (kept in the
//! tab's session storage), so roles are enforced by the API alone.
use crate::api::AppState;
use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use std::sync::OnceLock;

/// The console's pages: path under `/ui/` and title.
const PAGES: &[(&str, &str)] = &[
    ("routes", "Routes"),
    ("models", "Models"),
    ("experiments", "Experiments"),
    ("triton", "Triton plane"),
    ("audit", "Audit log"),
];

const TEMPLATES: &[(&str, &str)] = &[
    ("layout.html", include_str!("templates/layout.html")),
    ("routes.html", include_str!("templates/routes.html")),
    ("models.html", include_str!("templates/models.html")),
    (
        "experiments.html",
        include_str!("templates/experiments.html"),
    ),
    ("triton.html", include_str!("templates/triton.html")),
    ("audit.html", include_str!("templates/audit.html")),
];

const ASSETS: &[(&str, &str, &str)] = &[
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("static/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("static/console.css"),
    ),
];

fn templates() -> &'static minijinja::Environment<'static> {
    static ENV: OnceLock<minijinja::Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .expect("the console's templates parse");
        }
        env
    })
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/routes") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/routes") }))
        .route("/ui/static/{file}", get(asset))
        .route("/ui/{page}", get(page))
}

/// Renders one page, or 404 naming the pages there are.
fn render(page: &str) -> Result<String, String> {
    let Some((_, title)) = PAGES.iter().find(|(p, _)| *p == page) else {
        let known: Vec<&str> = PAGES.iter().map(|(p, _)| *p).collect();
        return Err(format!(
            "no console page `{page}`; pages: {}",
            known.join(", ")
        ));
    };
    let template = templates()
        .get_template(&format!("{page}.html"))
        .map_err(|e| e.to_string())?;
    template
        .render(minijinja::context! {
            page,
            title,
            pages => PAGES,
            version => env!("CARGO_PKG_VERSION"),
        })
        .map_err(|e| e.to_string())
}

async fn page(Path(page): Path<String>) -> Response {
    match render(&page) {
        Ok(html) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                // Only our own script and style; no framing (clickjacking).
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                ),
                (header::X_FRAME_OPTIONS, "DENY"),
            ],
            html,
        )
            .into_response(),
        Err(m) => (StatusCode::NOT_FOUND, m).into_response(),
    }
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, mime, body)) => ([(header::CONTENT_TYPE, *mime)], *body).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no console asset `{file}`")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_renders_with_the_navigation() {
        for (page, title) in PAGES {
            let html = render(page).unwrap();
            assert!(
                html.contains(&format!("<title>{title} · Switchyard</title>")),
                "{page}"
            );
            assert!(html.contains(&format!("data-page=\"{page}\"")), "{page}");
            for (other, _) in PAGES {
                assert!(html.contains(&format!("href=\"/ui/{other}\"")), "{page}");
            }
        }
        assert!(render("nope")
            .unwrap_err()
            .contains("pages: routes, models"));
    }
}
