//! `wharf:websocket/pubsub` through the chat example: rooms are topics, the
//! host fans each message out to the room's members.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Server, ServerOpts, Ws, recv_text, send_text};

async fn join(server: &Server, room: &str, nick: &str) -> Ws {
    let mut ws = server
        .connect_path(false, &format!("/chat/{room}?nick={nick}"))
        .await;
    assert_eq!(recv_text(&mut ws).await, format!("* {nick} joined {room}"));
    ws
}

#[tokio::test]
async fn chat_rooms_are_topics_fanned_out_by_the_host() {
    let server = Server::start(ServerOpts::new("chat"));
    let mut alice = join(&server, "r1", "alice").await;
    let mut bob = join(&server, "r1", "bob").await;
    assert_eq!(recv_text(&mut alice).await, "* bob joined r1");
    let mut carol = join(&server, "r2", "carol").await;

    send_text(&mut alice, "hello").await;
    assert_eq!(recv_text(&mut alice).await, "alice: hello");
    assert_eq!(recv_text(&mut bob).await, "alice: hello");

    // Another room's traffic never reaches r1.
    send_text(&mut carol, "hi").await;
    assert_eq!(recv_text(&mut carol).await, "carol: hi");
    send_text(&mut alice, "again").await;
    assert_eq!(recv_text(&mut bob).await, "alice: again");
    assert_eq!(recv_text(&mut alice).await, "alice: again");

    send_text(&mut bob, "/nick robert").await;
    assert_eq!(recv_text(&mut alice).await, "* bob is now robert");
    assert_eq!(recv_text(&mut bob).await, "* bob is now robert");

    bob.close(None).await.expect("close");
    assert_eq!(recv_text(&mut alice).await, "* robert left");
    // Bob's subscription went with his connection: alice is alone in r1.
    send_text(&mut alice, "anyone?").await;
    assert_eq!(recv_text(&mut alice).await, "alice: anyone?");
    alice.send(Message::Close(None)).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publish_reaches_every_subscriber() {
    const MEMBERS: usize = 300;
    let server = Server::start(ServerOpts::new("chat"));
    let mut members = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        members.push(join(&server, "big", &format!("m{i}")).await);
    }
    send_text(&mut members[0], "fan out").await;
    for (i, ws) in members.iter_mut().enumerate() {
        // Skip the join notices of those who came later.
        loop {
            let text = recv_text(ws).await;
            if text == "m0: fan out" {
                break;
            }
            assert!(text.starts_with("* m"), "member {i} got {text:?}");
        }
    }
}

#[tokio::test]
async fn bad_names_are_rejected_before_the_upgrade() {
    let server = Server::start(ServerOpts::new("chat"));
    for path in ["/chat/r1?nick=a%20b", "/chat/bad%room", "/elsewhere"] {
        let mut raw = server.raw(false).await;
        raw.send(crate::support::upgrade_request(path, &[]).as_bytes())
            .await;
        let resp = raw.read_response().await;
        assert!(resp.status == 400 || resp.status == 404, "{path}: {resp:?}");
    }
}
