//! Who is there: `GET /api/users` (the directory), `GET /api/dms` (conversations) and
//! `GET /api/admin/users` (accounts with roles, bans and sockets).

mod common;

use common::*;
use serde_json::{json, Value};

fn names(v: &Value, key: &str) -> Vec<String> {
    v["users"]
        .as_array()
        .unwrap_or_else(|| panic!("no users in {v}"))
        .iter()
        .map(|u| u[key].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_directory_finds_users_by_prefix_and_tells_who_is_online() {
    let srv = start_unlimited(&["--register-rate", "0"]);
    let alice = new_user(&srv, "alice");
    for n in ["Albert", "al_x", "alx", "bob"] {
        register(&srv, n);
    }
    let r = srv.get("/api/users?q=AL", Some(&alice));
    assert_status(&r, 200);
    let v = r.json();
    assert_eq!(names(&v, "username"), ["al_x", "Albert", "alice", "alx"]);
    // `_` is a literal, not a wildcard.
    assert_eq!(
        names(
            &srv.get("/api/users?q=al_", Some(&alice)).json(),
            "username"
        ),
        ["al_x"]
    );
    assert_eq!(
        names(
            &srv.get("/api/users?q=a&limit=2", Some(&alice)).json(),
            "username"
        )
        .len(),
        2
    );
    // Online: alice has a socket, Albert does not.
    let _ws = Ws::connect(&srv, &alice);
    let v = srv.get("/api/users?q=al", Some(&alice)).json();
    let online: Vec<(String, bool)> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["username"].as_str().unwrap().into(),
                u["online"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(online.contains(&("alice".into(), true)), "{online:?}");
    assert!(online.contains(&("Albert".into(), false)), "{online:?}");
    assert_error(&srv.get("/api/users", None), 401, "unauthorized");
}

#[test]
fn conversations_list_the_latest_dm_with_each_user_newest_first() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    register(&srv, "carol");
    let mut a = Ws::connect(&srv, &alice);
    let mut b = Ws::connect(&srv, &bob);
    let dm = |ws: &mut Ws, to: &str, body: &str| {
        ws.send(&json!({"type": "dm", "to": to, "body": body, "ref": "d"}));
        loop {
            if ws.recv()["type"] == "ack" {
                break;
            }
        }
    };
    dm(&mut a, "bob", "one");
    dm(&mut a, "carol", "two");
    dm(&mut b, "alice", "three");
    let v = srv.get("/api/dms", Some(&alice)).json();
    let convs: Vec<(String, String)> = v["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["user"].as_str().unwrap().into(),
                c["last"]["body"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        convs,
        [
            ("bob".into(), "three".into()),
            ("carol".into(), "two".into())
        ]
    );
    let v = srv.get("/api/dms", Some(&bob)).json();
    assert_eq!(v["conversations"].as_array().unwrap().len(), 1);
}

#[test]
fn admins_list_accounts_with_roles_bans_and_sockets() {
    let srv = start_unlimited(&[]);
    let admin = new_user(&srv, "admin");
    let bob = new_user(&srv, "bob");
    register(&srv, "carol");
    let _b1 = Ws::connect(&srv, &bob);
    let _b2 = Ws::connect(&srv, &bob);
    assert_status(
        &srv.post_empty("/api/admin/users/carol/ban", Some(&admin)),
        204,
    );
    let v = srv.get("/api/admin/users", Some(&admin)).json();
    let users = v["users"].as_array().unwrap();
    assert_eq!(names(&v, "username"), ["admin", "bob", "carol"]);
    let bob_row = &users[1];
    assert_eq!(bob_row["roles"], json!(["member"]));
    assert_eq!(bob_row["sockets"], 2);
    assert_eq!(bob_row["banned"], false);
    assert!(bob_row["id"].is_i64() && bob_row["created_at"].is_string());
    assert_eq!(users[2]["banned"], true);
    assert_eq!(users[0]["roles"], json!(["admin"]));
    // Paging with after.
    let v = srv
        .get("/api/admin/users?after=bob&limit=5", Some(&admin))
        .json();
    assert_eq!(names(&v, "username"), ["carol"]);
    // A member may not.
    let r = srv.get("/api/admin/users", Some(&bob));
    assert_error(&r, 403, "forbidden");
}
