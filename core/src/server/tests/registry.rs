use super::*;

#[test]
fn losing_the_registry_session_fences_every_connection() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.login(0, 2, 8, 1);
    h.open(0, 3);
    h.open(0, 4);
    let ticket = h.ticket(9, 2);
    h.login_frame(0, 4, ticket);
    assert_eq!(
        h.node.session_list(),
        vec![
            (UserId(7), Epoch(3), ConnId(1)),
            (UserId(8), Epoch(1), ConnId(2))
        ]
    );
    h.node.handle_registry_session_lost(h.at(50));
    assert_eq!(
        h.drain(),
        [
            kick(1, KickReason::Fenced).as_slice(),
            &[release(7, 3)],
            &kick(2, KickReason::Fenced),
            &[release(8, 1)],
            &kick(3, KickReason::Fenced),
            &kick(4, KickReason::Fenced),
        ]
        .concat()
    );
    assert_eq!(h.node.stats().fenced, 2);
    assert_eq!(h.node.connections(), 0);
    // The bind that was in flight lands: nobody gets a LoginOk, the claim goes back.
    assert_eq!(
        h.reply_to(
            60,
            |c| matches!(c, StoreCommand::BindSession { .. }),
            Ok(StoreReply::SessionBound(Ok(())))
        ),
        vec![release(9, 2)]
    );
    // No client is accepted until the server is registered again.
    assert_eq!(
        h.node.handle_connection_opened(h.at(100), ConnId(5)),
        Err(Refused::Unregistered)
    );
    h.node.handle_registered(h.at(200));
    h.open(200, 5);
}

/// The kick message of every Kick output (the summary drops texts).
fn kick_messages(h: &mut Harness) -> Vec<String> {
    let mut messages = Vec::new();
    while let Some(o) = h.node.poll_output() {
        if let ServerOutput::Transmit {
            frame: Frame {
                kind: Some(Kind::Kick(k)),
            },
            ..
        } = o
        {
            messages.push(k.message);
        }
    }
    messages
}

#[test]
fn a_fence_says_which_of_store_and_registry_was_lost() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.node.handle_store_lost(h.at(10));
    assert_eq!(kick_messages(&mut h), vec!["server lost the store"]);
    h.node.handle_store_back(h.at(20));
    h.login(30, 2, 7, 4);
    h.node.handle_registry_session_lost(h.at(40));
    assert_eq!(
        kick_messages(&mut h),
        vec!["server lost its registry session"]
    );
    assert_eq!(h.node.stats().fenced, 2);
    assert_eq!(h.node.stats().kicks(KickReason::Fenced), 2);
}

#[test]
fn losing_the_store_fences_every_connection_like_a_registry_loss() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.open(0, 2);
    h.node.handle_store_lost(h.at(50));
    assert_eq!(
        h.drain(),
        [
            kick(1, KickReason::Fenced).as_slice(),
            &[release(7, 3)],
            &kick(2, KickReason::Fenced),
        ]
        .concat()
    );
    assert!(h.node.is_withdrawn());
}

/// Inputs in order at the given milliseconds, then whether a connection opened after
/// them is accepted (and with which refusal if not). The store and the registry are
/// separate reasons: each must be back before clients are accepted.
#[test]
fn clients_are_refused_while_store_or_registry_is_lost() {
    #[derive(Debug, Clone, Copy)]
    enum In {
        StoreLost,
        StoreBack,
        RegistryLost,
        Registered,
        Drain,
    }
    use In::*;
    let cases: &[(&str, &[In], Result<(), Refused>)] = &[
        ("nothing lost", &[], Ok(())),
        ("store lost", &[StoreLost], Err(Refused::StoreUnreachable)),
        ("store back", &[StoreLost, StoreBack], Ok(())),
        ("registry lost", &[RegistryLost], Err(Refused::Unregistered)),
        ("registered again", &[RegistryLost, Registered], Ok(())),
        (
            "store back, registry still lost",
            &[StoreLost, RegistryLost, StoreBack],
            Err(Refused::Unregistered),
        ),
        (
            "registered again, store still lost",
            &[RegistryLost, StoreLost, Registered],
            Err(Refused::StoreUnreachable),
        ),
        (
            "both back",
            &[StoreLost, RegistryLost, Registered, StoreBack],
            Ok(()),
        ),
        (
            "a back without a loss changes nothing",
            &[StoreBack, Registered],
            Ok(()),
        ),
        ("draining", &[Drain], Err(Refused::Draining)),
        (
            "withdrawn and draining: the withdrawal is said",
            &[Drain, StoreLost],
            Err(Refused::StoreUnreachable),
        ),
    ];
    for &(name, inputs, want) in cases {
        let mut h = Harness::new();
        for (i, input) in inputs.iter().enumerate() {
            let now = h.at(10 * i as u64);
            match input {
                StoreLost => h.node.handle_store_lost(now),
                StoreBack => h.node.handle_store_back(now),
                RegistryLost => h.node.handle_registry_session_lost(now),
                Registered => h.node.handle_registered(now),
                Drain => h.node.begin_drain(now),
            }
        }
        assert_eq!(
            h.node.is_withdrawn(),
            matches!(want, Err(Refused::StoreUnreachable | Refused::Unregistered)),
            "{name}"
        );
        assert_eq!(
            h.node.handle_connection_opened(h.at(100), ConnId(9)),
            want,
            "{name}"
        );
        let refused = u64::from(want.is_err());
        assert_eq!(h.node.stats().refused_connections, refused, "{name}");
        assert_eq!(h.node.connections(), usize::from(want.is_ok()), "{name}");
    }
}
